"""flowact: a FlowAct-R1-style streaming talking-avatar model and its Triton serving stack."""
