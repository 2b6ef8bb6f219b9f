"""Where branch jobs run. Every launcher takes the same job list; ``local`` runs them one after another."""
