"""Builds the Python extension qatx._C from csrc/ (the C++ library for libtorch users is
built by CMakeLists.txt from the same sources).

CUDA kernels are compiled when torch sees a GPU or when QATX_CUDA=1; QATX_CUDA=0 forces a
CPU-only build. CUDA architectures default to sm_80 and sm_90 (TORCH_CUDA_ARCH_LIST overrides).
"""
import glob
import os

from setuptools import find_packages, setup
from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension
import torch

ROOT = os.path.dirname(os.path.abspath(__file__))
VERSION = open(os.path.join(ROOT, "VERSION")).read().strip()


def version_number(version):
    major, minor, patch = (int(p) for p in version.split("."))
    return major * 10000 + minor * 100 + patch


def want_cuda():
    flag = os.environ.get("QATX_CUDA")
    if flag is not None:
        return flag == "1"
    return torch.cuda.is_available()


def nvidia_wheel_include_dirs():
    """Headers of the CUDA libraries torch's wheel depends on (cuSPARSE, cuBLAS, ...), for CUDA
    toolkits installed without them."""
    import importlib.util

    spec = importlib.util.find_spec("nvidia")
    if spec is None or not spec.submodule_search_locations:
        return []
    return sorted(d for base in spec.submodule_search_locations for d in glob.glob(os.path.join(base, "*", "include")))


def sources(pattern):
    return sorted(glob.glob(os.path.join("csrc", "qatx", "**", pattern), recursive=True))


def extension():
    use_cuda = want_cuda()
    cpp = sources("*.cpp")
    cuda = sources("*.cu") if use_cuda else []
    defines = [f"-DQATX_VERSION_NUMBER={version_number(VERSION)}"]
    # at::parallel_for runs its work serially unless the caller is compiled with OpenMP when
    # torch's parallel backend is OpenMP (the Linux wheels); libgomp is the one torch ships.
    openmp = ["-fopenmp"] if torch._C.has_openmp else []
    args = {
        "cxx": ["-O3"] + openmp + defines,
    }
    if use_cuda:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
        args["nvcc"] = ["-O3", "--expt-relaxed-constexpr"] + defines
        return CUDAExtension("qatx._C", cpp + cuda,
                             include_dirs=[os.path.join(ROOT, "csrc")] + nvidia_wheel_include_dirs(),
                             extra_compile_args=args, extra_link_args=openmp,
                             define_macros=[("QATX_WITH_CUDA", "1")])
    return CppExtension("qatx._C", cpp, include_dirs=[os.path.join(ROOT, "csrc")], extra_compile_args=args,
                        extra_link_args=openmp)


setup(
    name="qatx",
    version=VERSION,
    description="Quantization-aware training and post-training quantization for PyTorch, with C++/CUDA ops",
    package_dir={"": "python"},
    packages=find_packages("python"),
    ext_modules=[extension()],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
    python_requires=">=3.10",
    install_requires=["torch>=2.11,<2.15"],
)
