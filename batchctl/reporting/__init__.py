"""The run report: the analysis of a run's terminal records, and report.html.

``analysis`` is pure (no I/O, no plotting) and streams over the ledger with bounded memory;
``html`` renders a RunReport (which carries the analysis as ``stats``) into one
self-contained HTML page. ``html`` imports matplotlib, so import it only where plots are drawn.
"""

from batchctl.reporting.analysis import RunAnalysis, analyze

__all__ = ["RunAnalysis", "analyze"]
