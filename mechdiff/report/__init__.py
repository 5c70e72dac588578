"""The HTML report of a run (a leaf: the pipeline and the CLI use it; the studies draw their own figures with
``mechdiff.analyses.plotting``)."""
