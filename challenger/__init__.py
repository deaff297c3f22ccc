"""Watchtower challenger (Celery)."""
