"""mvcckv: etcd's v3 storage semantics in pure Python."""

__version__ = "0.1.0"
