"""gRPC transport: servicers, health, reflection; protobuf converted here only."""
