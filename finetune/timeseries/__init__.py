"""Global temperature and wind forecasting (issue 22), in progress: the data layer (the Global Temp / Wind layout
read safely, the authors' windows, time features, station grouping, moving-average decomposition, decoder inits,
the persistence baseline) and the demo set. The Corrformer embedding and decoder around UniRepLKNet, the trainer
task and its registration come next; nothing registers this task yet."""
