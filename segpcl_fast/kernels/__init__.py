"""segpcl_fast.kernels: Triton kernels, one file per fused op (reference, kernel, launcher,
torch.library custom op with fake + autograd). Knows only torch and triton.

- pgd_step:        DPGD projected sign-gradient step        (segpcl::pgd_step, segpcl::pgd_step_)
- anchor_kl:       ACGD tempered KL, loss + grad in one pass (segpcl::anchor_kl_rows)
- knn_subgraph_kl: TSGR kNN-subgraph KL + deterministic bwd  (segpcl::knn_subgraph_kl_rows, _backward)
- lora_merge:      the merged LoRA weight W + s B A          (segpcl::lora_merged_weight)
- lora_fused:      the LoRA-B-only linear as two Triton GEMMs with u = x A^T and g^T u in their
                   launches (segpcl::lora_fused_fwd, _bwd; ops backend "triton")

check_triton_build: compiles every kernel as its launcher calls it for sm_89 / sm_90 without a GPU
(`python -m segpcl_fast.kernels.check_triton_build`), with registers, spills, shared memory, occupancy.

Modules are imported on demand (segpcl_fast.ops does it), so importing this package is cheap and
works without triton.
"""
