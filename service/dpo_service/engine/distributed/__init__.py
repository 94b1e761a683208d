"""One logical service over a torchrun world (issue 13; README "Past one device").

Rank 0 runs the whole service (listeners, admission, batching, versions, idempotency,
checkpoints); every other rank runs :func:`~dpo_service.engine.distributed.follower.follow`,
which executes what rank 0's worker thread broadcasts (:mod:`.wire`): sharded forward passes
(:mod:`.sharded`), data-parallel train steps (DDP or FSDP2, :mod:`.parallel`), session
changes and checkpoint gathers. In a world of one (no torchrun) none of this runs.
"""
