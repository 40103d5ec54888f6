"""Code the services share: settings, errors, the artifact store, models, text."""
