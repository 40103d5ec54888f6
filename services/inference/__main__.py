from tunewire.services.inference.server import serve

serve()
