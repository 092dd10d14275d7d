"""Shared foundations: errors, small utilities, preprocessing as data, statistics."""
