"""Global temperature and wind forecasting (issue 22), in progress: the data layer (the Global Temp / Wind layout
read safely, the authors' windows, time features, station grouping, moving-average decomposition, decoder inits,
the persistence baseline), the demo set, and the forecaster's input side (window normalization and its inverse,
node grouping, Corrformer's embedding, the 192 x 192 map and the encoder's tokens). The Multi-Correlation decoder,
the trainer task and its registration come next; nothing registers this task yet."""
