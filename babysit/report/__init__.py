"""What people see, derived from storage: the dashboard feed (publish.py), the report
(document.py, render.py), the plots (plots.py), `babysit export` and `babysit status`.
No torch at import."""
