"""Instrumentation for engine tests: observe a live engine step by step."""

from contextlib import contextmanager


@contextmanager
def used_blocks_per_step(llm):
    """Yields a list that receives the block manager's count of used KV blocks after every
    engine step taken inside the block."""
    engine, used = llm.engine, []
    engine_step = engine.step

    def step():
        outputs = engine_step()
        used.append(engine.block_manager.num_used_blocks)
        return outputs

    engine.step = step
    try:
        yield used
    finally:
        del engine.step  # the class's method again
