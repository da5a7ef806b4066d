"""pytest plugins: broker processes started on free loopback ports."""
