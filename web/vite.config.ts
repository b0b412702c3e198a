import { defineConfig } from 'vite';

// The daemon embeds dist/ at compile time and serves it at / (index.html for
// every non-API path) and /assets/* (content-hashed names, cached for a year).
export default defineConfig({
  base: '/',
  build: {
    outDir: 'dist',
    assetsDir: 'assets',
    emptyOutDir: true,
    sourcemap: false,
    chunkSizeWarningLimit: 1024,
  },
  server: {
    // `npm run dev` against a daemon: VIREO_DEV_API=http://127.0.0.1:PORT
    proxy: process.env.VIREO_DEV_API
      ? { '/v1': { target: process.env.VIREO_DEV_API, ws: true, secure: false } }
      : undefined,
  },
});
