"""The ``rpsft`` application: the command line assembled from the four packages, lowest first.

``rpsft.core`` (the method) < ``evaluation`` < ``sweeps`` < ``dashboards``; this package sits above them all
and is the only place that knows every layer.
"""
