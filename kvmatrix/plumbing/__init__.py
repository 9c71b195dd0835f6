"""Host plumbing below both ``models/`` and ``matrix/``: one-line errors and progress (``console``), the
content-keyed cache folder and virtualenvs (``envs``). Imports nothing else of kvmatrix."""
