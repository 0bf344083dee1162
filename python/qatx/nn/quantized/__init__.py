"""INT8 inference modules (float in, float out, integer arithmetic inside); :func:`qatx.convert`
makes them from QAT modules."""
from .modules import (Add, Cat, Conv1d, Conv2d, Conv3d, ConvTranspose1d, ConvTranspose2d, ConvTranspose3d,
                      DynamicLinear, Embedding, Linear, Matmul, MaxPool2d, pack_int4, unpack_int4)

__all__ = ["Linear", "Conv1d", "Conv2d", "Conv3d", "ConvTranspose1d", "ConvTranspose2d", "ConvTranspose3d",
           "Embedding", "Add", "Cat", "Matmul", "MaxPool2d", "DynamicLinear", "pack_int4", "unpack_int4"]
