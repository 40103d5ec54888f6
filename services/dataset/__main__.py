from tunewire.services.dataset.server import serve

serve()
