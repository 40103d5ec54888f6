"""tunewire: fine-tuning of large language models as gRPC microservices.

The installed package maps the repository's folders: `tunewire.services` is
services/, `tunewire.clients` is clients/, and `tunewire.v1` holds the stubs
generated from protos/.
"""

__version__ = "0.1.0"
