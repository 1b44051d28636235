"""Views: the recipe, epoch plans, mixing partners, the deal to ranks, the per-sample transform and replay."""
