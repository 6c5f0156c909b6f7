"""This rank's place in the parallel layout a checkpoint is saved at."""

from megatron.core import parallel_state


def layout_positions() -> list:
    """(size, rank) of this rank in pipeline, tensor and data (with context) parallelism."""
    ps = parallel_state
    return [
        (ps.get_pipeline_model_parallel_world_size(), ps.get_pipeline_model_parallel_rank()),
        (ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank()),
        (
            ps.get_data_parallel_world_size(with_context_parallel=True),
            ps.get_data_parallel_rank(with_context_parallel=True),
        ),
    ]


def layout() -> dict:
    sizes = [size for size, _ in layout_positions()]
    return dict(zip(("pipeline_parallel", "tensor_parallel", "data_parallel"), sizes))
