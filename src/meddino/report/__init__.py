"""Reporting: tables (mean +/- std), bootstrap intervals and rank stability, plots, HTML.

Kept import-light on purpose: import the submodule you need (``from meddino.report import stats``).
"""
