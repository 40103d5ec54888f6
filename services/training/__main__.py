from tunewire.services.training.server import serve

serve()
