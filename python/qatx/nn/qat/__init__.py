"""QAT layers (``qatx.nn.qat.Linear``, ``Conv2d``, ...) and fused Conv/Linear+BN layers with
simulated BN folding. :func:`qatx.prepare_qat` swaps them into a model."""
from .fused import ConvBn1d, ConvBn2d, ConvBn3d, ConvBnReLU1d, ConvBnReLU2d, ConvBnReLU3d, LinearBn1d
from .modules import (Conv1d, Conv2d, Conv3d, ConvTranspose1d, ConvTranspose2d, ConvTranspose3d, Embedding, Linear,
                      QATModule)

__all__ = ["QATModule", "Linear", "Conv1d", "Conv2d", "Conv3d", "ConvTranspose1d", "ConvTranspose2d",
           "ConvTranspose3d", "Embedding", "ConvBn1d", "ConvBn2d", "ConvBn3d", "ConvBnReLU1d", "ConvBnReLU2d",
           "ConvBnReLU3d", "LinearBn1d"]
