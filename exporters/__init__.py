"""Exporters: Parquet tables and the offline HTML viewer."""
