"""Saving and resuming training exactly: model, optimizer, LR schedule, RNG and the trainer's state.

Layout (Megatron-LM's)::

    save_dir/latest_checkpointed_iteration.txt   the iteration to resume from, e.g. "100"
    save_dir/iter_0000100/                       a megatron-core distributed checkpoint

``checkpoint`` saves and loads (``save_checkpoint``, ``load_checkpoint``); ``files`` keeps the
directory crash-safe; ``checksums`` records and checks every file's SHA-256; ``optimizer_state``
holds the optimizer workarounds; ``rng_state`` and ``layout`` the per-rank RNG streams and the
parallel layout they belong to; ``disk_space`` turns a full disk into a message.
"""
