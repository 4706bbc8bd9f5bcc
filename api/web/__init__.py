"""The dashboard's files (served by api/routes/web.py): a package so they ship as package data."""
