"""``lsb``: the backend's detectors, datasets, evaluation and registry from the command line.

One module per command (``detect``, ``export``, ``push``, ``check``, ``train``, ``eval``,
``versions``, ``rollback``); :mod:`worker.cli.common` holds what they share (settings, label
configs from ``--label-config``/``--labels``, drafting sources, image lists, the thread pool) and
:mod:`worker.cli.results` the per-image JSON schema ``detect`` writes and the others read.
Run ``lsb --help`` or ``python -m worker.cli --help``.
"""
