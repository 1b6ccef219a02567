"""What training changed: checkpoint readers (`checkpoints`), parameter names to (layer, component) and
selectors (`components`), the streaming per-layer diff (`diff`), and plots of its frames (`plots`)."""
