"""Analysis of runs, after or beside training; among them ``parallel-dkp report`` (figures from a run's
``metrics.jsonl`` and ``alignment.jsonl``, :mod:`parallel_dkp.analysis.report`) and optional
TensorBoard logging (:class:`parallel_dkp.analysis.tensorboard.TensorBoardLogger`).

This package imports none of its modules: each is imported where it is used, so that the optional
extras (``pip install 'parallel_dkp[plots]'`` for matplotlib, ``'parallel_dkp[tensorboard]'``) and
torch are loaded only by the commands that need them.
"""
