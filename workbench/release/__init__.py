"""`workbench release`: the chain of verbs from one release file, cached stage by stage, with model cards,
one index and CI reports."""
