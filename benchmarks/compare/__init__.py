"""``make compare``: splitkd against Flower FedAvg on the same shards and the same student.

Kept import-free: ``flower_app`` runs in the Flower virtual environment, which
has none of splitkd's service dependencies.
"""
