"""Benchmarks of attn_ops against its peers: `python -m bench --help`.

cases.py lists what is measured, providers.py who is measured, masks.py how each mask kind (and
score modifier) is spelled for each provider, measure.py how a row is timed, report.py the
JSON/Markdown/PNG outputs, demo.py the short model demo that runs first, test_regression.py the
pytest-benchmark GPU cases.
"""
