"""Ultralytics YOLO (placeholder filled below)."""
YOLO_FAMILIES: tuple = ()
