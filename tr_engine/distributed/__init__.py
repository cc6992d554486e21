"""How work is spread over ranks: the zigzag sequence layout (`zigzag`, its padding rule in
`padding`) and the tensor-parallel mesh (`tensor_parallel`). The package imports nothing
itself, so the host-side scheduler can use `padding` without torch.distributed."""
