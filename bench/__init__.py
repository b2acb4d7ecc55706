"""Benchmarks for loadertune: ``python -m bench [--quick] [--only NAME[,NAME]]``.

``bench.workloads`` defines the workloads, ``bench.run`` the harness and the report,
``bench.micro`` the micro-benchmarks. See bench/README.md.
"""

from __future__ import annotations
