"""kv_store"""
