"""Trace data shipped with WarmServe; each folder keeps its licence and SOURCE.txt."""
