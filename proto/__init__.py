"""Generated protobuf modules for nc (built by build.sh from nc.proto)."""
