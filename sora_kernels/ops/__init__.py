"""One op per module: Triton kernels -> launchers -> custom ops and autograd -> public function."""
