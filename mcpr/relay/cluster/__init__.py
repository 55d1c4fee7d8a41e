"""The relay's cluster mode: several relay nodes serve one domain as if they were one.

A gateway's tunnel lives on whichever node it registered with, but a public
request may reach any node, so the nodes share a directory of which node holds
which name (Redis, `directory`), with atomic claims so that a name is never
served twice, and a node that does not hold a name forwards the request to the
one that does over an internal listener (`peers`); `node` keeps one node's
claims in step with its registry.  Each node keeps serving its own tunnels if
Redis goes away; only new registrations wait for it.
"""
