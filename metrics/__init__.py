"""
Prometheus metrics of linkup's processes.
"""
