"""Report and figures from result cells: ``python -m kvmatrix.analysis.report DIR``."""
