"""The admin listener: health, metrics and live logs."""
