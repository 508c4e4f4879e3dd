"""etcd's v3 gRPC API over the mvcckv store: ``mvcckv serve``.

Modules, one per etcd concept (etcd's ``server/etcdserver/api/v3rpc``):

* ``config``      the ``serve`` flags (etcd's names, ``MVCCKV_*`` variables)
* ``app``         the grpc.aio server: options, metadata checks, start/stop
* ``node``        this member's identity and the header every response gets
* ``identity``    member / cluster ID derivation from peer URLs and token
* ``kv``, ``watch``, ``lease``, ``maintenance``, ``cluster``   the services
* ``rpctypes``    the one table from error type to gRPC status code
* ``compactor``   ``--auto-compaction-mode`` periodic / revision
"""
