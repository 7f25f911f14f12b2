"""A real network split on one Linux machine (``make testbed``, needs root).

``netns`` builds network namespaces joined by veth pairs through a bridge and
shapes each edge's bandwidth with ``tc``; ``linkemu`` adds each link's one-way
latency and jitter in user space (this kernel has no ``netem``); ``run``
starts the cloud and the edges in their namespaces, trains, deploys, infers,
reports and always tears the network down. See docs/TESTBED.md.
"""
