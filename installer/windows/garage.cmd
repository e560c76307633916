@echo off
rem garage.cmd: the garage command of the Windows install (garage status, garage pause, garage doctor...).
rem It runs the bundled Node 22 runtime (resources\node) on the app's code (resources\app).
setlocal
"%~dp0resources\node\node.exe" "%~dp0resources\app\bin\garage.js" %*
exit /b %ERRORLEVEL%
