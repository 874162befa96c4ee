from kernels.dispatch import KernelOps, select_kernels

__all__ = ["KernelOps", "select_kernels"]
