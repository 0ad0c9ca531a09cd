"""QA review of AI findings: decisions stored as data, a web worklist, metrics and a report.

Submodules import their web and plotting libraries lazily; importing this package is cheap.
"""
