"""Reports of benchmark results: the paper's tables (Markdown, LaTeX, CSV) and plots (PNG)."""
