"""prefetch_workers"""
